"""Model loading, FedBiOT layer extraction, LoRA wiring, wire format and export."""
