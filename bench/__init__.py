"""Benchmarks: side by side in one run, interleaved, medians of repeats (ratios are stable on noisy
machines; absolute times are not). Each script prints a markdown table and writes JSON."""
