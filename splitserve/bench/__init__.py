"""`splitserve bench`: latency, throughput and small-batch workloads, optionally against HF transformers."""
