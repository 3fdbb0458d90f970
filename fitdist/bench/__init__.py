"""Benchmarks behind `fitdist bench <name>`: each module has `main(argv) -> int`."""
