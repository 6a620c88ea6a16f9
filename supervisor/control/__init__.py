"""The control plane: JSON-RPC 2.0 over the control socket (contract section 8).

- :mod:`supervisor.control.protocol`: framing, error codes and the method table.
- :mod:`supervisor.control.socketfile`: the socket on disk (folder 0700 and ACLs,
  the stale-socket test, the bind), light enough for the client.
- :mod:`supervisor.control.server`: :func:`~supervisor.control.server.serve`, used
  by the daemon (imports anyio): accept loop, connections, framing, shutdown.
- :mod:`supervisor.control.methods`: what each method asks of the daemon
  (:class:`~supervisor.control.methods.ControlTarget`).
- :mod:`supervisor.control.outbox`: the byte-bounded queues of following clients.
- :mod:`supervisor.control.client`: :class:`~supervisor.control.client.ControlClient`,
  blocking and light, used by the CLI.

Nothing is imported here, so that importing the client stays cheap.
"""
