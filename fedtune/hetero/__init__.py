"""Members that differ: heterogeneous ranks, personalization, distillation, FedMKT, FedCoLLM, offsite."""
