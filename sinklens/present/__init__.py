"""Step 4 of the flow: what composes the analyses for people: the report and the command line."""
