"""Cluster security: one certificate authority per cluster, mTLS on every channel,
bearer tokens with roles for clients, and the client's credential profiles.

- :mod:`hotwire.security.pki`: the cluster CA and the certificates it issues
  (master, worker, client), made with the ``cryptography`` library.
- :mod:`hotwire.security.tls`: those files as gRPC credentials and ``ssl``
  contexts, the identity in a peer's certificate, and client profiles.
- :mod:`hotwire.security.tokens`: bearer tokens and the roles they grant.
"""
