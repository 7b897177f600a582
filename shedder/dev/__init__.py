"""Developer tools: training the bundled models, real-shape builders, scale benchmarks."""
