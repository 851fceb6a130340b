"""Stage 3a, annotation: the order in which curators should see questions, and (next) the Label Studio
round trip."""
