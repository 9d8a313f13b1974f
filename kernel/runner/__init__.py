"""The model runner: the kernel's device driver. The model and its paged attention (torch
and Triton), CUDA graphs, the checkpoint loader, the tokenizer, the sampler and the
batch-invariant ops. It computes what the kernel asks (a step's chunks, block copies)
and knows nothing of processes, policies or memory management."""
