"""auditlens benchmarks: accuracy, speed, size and scale, side by side with classical
peers, in one run. Run ``python -m bench --help`` from the repository root."""
