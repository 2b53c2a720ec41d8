"""MIGlet's benchmarks: latency, start-up overhead, idle footprint and fleet scale (`just bench`)."""
