"""The study commands: the comparison at matched MACs, the stopping (anytime) study, the
precision study and the benchmark, and the reports (JSON, Markdown, plots) they write."""
