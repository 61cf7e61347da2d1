"""For the test modules that run a cluster inside the suite's own process (test_cluster, test_access_cluster,
test_cluster_exposure).

``cluster.app.shutdown`` bounds each step (a user's Ctrl-C must not wait on Ray) and goes on without a step that
overruns, which leaves ``ray.shutdown`` running in a daemon thread. In the suite's process that half-stopped Ray
later aborted or crashed the whole run (SIGABRT, SIGSEGV) on a busy CI machine, where the default 10 s budget ran
out. These modules give shutdown enough time to finish in their own flow.
"""

IN_PROCESS_SHUTDOWN_S = 180.0
