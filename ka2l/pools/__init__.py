"""Question pools: reading and validating files, the demo pools and public sources."""
