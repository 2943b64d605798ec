"""tc: sparse transcoders for an LLM's MLP. One module per concept of the data flow (docs/architecture.md)."""
