"""gRPC on a Unix socket, both ends, by job.

- :mod:`.transport`: calls over one HTTP/2 connection on a Trio stream; the only
  module that imports purerpc (its sans-I/O ``grpclib`` layer) or h2.
- :mod:`.server`: the accept loop, connection limits and timeouts, call dispatch.
- :mod:`.client`: a channel to the daemon, unary and streaming calls.
- :mod:`.endpoint`: binding the daemon's socket.
"""
