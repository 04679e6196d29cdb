"""Running exported models: sessions, generation, parity, latency, and the roofline planner."""
