"""Exit codes of the ``flowship`` commands, and the text ``--help`` shows about them.

A module of their own, with no imports: the CLI names them in its help, which must not load the pipeline.
"""

EXIT_OK = 0
EXIT_FAILED = 1  # a component failed (start-up or during the run)
EXIT_USAGE = 2  # the command line is wrong (argparse's code; LSB: invalid or excess arguments)
EXIT_REJECTED = 3  # finished, but some input lines were rejected
EXIT_UNDELIVERED = 4  # flows read were not delivered to every sink (left in a buffer, unacknowledged)
EXIT_DEAD_LETTERED = 5  # every flow was settled, but some went to a dead-letter file
EXIT_CONFIG = 6  # the configuration is invalid (LSB: program is not configured)

# 2 and 6 are what LSB init scripts and systemd mean by them: invalid arguments, not configured.
EXIT_CODES = """\
Exit codes (the most serious outcome of a run wins):
  0  ok: every flow read was delivered to every sink, or dropped on purpose and counted
     (a stage, a full disk buffer with when_full: drop_newest); after SIGTERM/SIGINT, what
     was not delivered yet is kept in the sinks' disk buffers for the next start
  1  a component failed (could not start, a sink or source error)
  2  usage: the command line is wrong (unknown option, bad value); nothing was run
  3  finished, but some input lines were rejected (each logged with file:line)
  4  undelivered: flows read are neither delivered nor dead-lettered (still in a disk buffer
     at the end of the input, a sink flush timed out, a sink busy at the shutdown deadline)
  5  dead-lettered: every flow was settled, but some went to a sink's dead-letter file
  6  invalid configuration (each problem named with file and key path); nothing was run
"""

