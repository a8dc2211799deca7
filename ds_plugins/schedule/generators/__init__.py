"""Schedule generators: one module per schedule, each a pure function of (shape, costs) -> Schedule."""
