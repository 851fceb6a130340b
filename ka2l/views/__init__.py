"""What the pages show, without Streamlit: the scores table, hidden-state maps and downloads."""
