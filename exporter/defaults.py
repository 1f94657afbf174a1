"""The embedded default configs (also in configs/ as files, checked equal by a test)."""

EXPORT_DEFAULT = """\
# flowship export, embedded default: Hubble JSON lines on stdin -> Parquet under ./flows
sources:
  - type: stdin
sinks:
  - type: parquet
    path: ./flows
"""

AGENT_DEFAULT = """\
# flowship agent, embedded default: capture every non-loopback interface that is up
# with eBPF and write Parquet under ./flows
sources:
  - type: agent
sinks:
  - type: parquet
    path: ./flows
"""
