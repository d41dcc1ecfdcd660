"""One harness for every benchmark: launch the server, its remote workers and redis (launch), sample
a process tree's RSS, CPU and open files (sampling), print aligned tables and write them as JSON (report)."""
