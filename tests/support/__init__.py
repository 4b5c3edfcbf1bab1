"""Test support: the one copy of what many tests need.

snapctl   running snapctl (one runner: arguments, environment, JSON, checked or not)
data      recognisable data patterns and sha256 of files, byte strings and exports
faults    a Device that fails reads, writes or syncs on demand, by block or by count
iolog     a Device that records every write, sync, discard and truncate, in memory or to a
          file (for nbdkit), and the reader of that file
logcheck  the watch behind the autouse fixture that fails a test when the engine logs a
          warning or an error the test did not declare (in-process, and in the logs of the
          nbdkit servers it started)
"""
