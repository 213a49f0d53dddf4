"""Privacy layers that wrap strategies (coordinator side) and tasks (participant side): DP, secure
aggregation, compression, robust aggregation. Imports learning, never the reverse."""
