"""The runtime TFF computations run on.

* `workers`: starting and stopping TFF's C++ `worker_binary`, on every exit path.
* `interrupts`: SIGINT/SIGTERM handlers that record and raise, deferred inside
  TensorFlow code; shutdown without worker restarts.
* `contexts`: TFF execution contexts over a loopback worker we start or over
  remote workers.
* `channels`: gRPC channels to workers: options, readiness, a clean close.
* `tf_logging`: how chatty TensorFlow, gRPC and the worker are.
* `memory`: the Python process's free heap pages back to the OS between rounds,
  at most once a second (glibc's `malloc_trim`).
* `autograph`: the modules AutoGraph leaves as written while fedprune traces.
* `deferred_imports`: modules TFF's import loads and fedprune never runs, loaded
  at their first use instead (the package's `__init__` defers them).

Importing any of them is cheap (standard library only).
"""
