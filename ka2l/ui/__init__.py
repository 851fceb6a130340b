"""The only ka2l package that imports streamlit: cached readers and widgets the pages share."""
