"""flowship node agent: eBPF capture, decoding, flow assembly, enrichment and the Observer API."""
