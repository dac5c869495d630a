"""
banyan-kproxy: zero-trust access to Kubernetes API servers.

An OIDC-verifying, impersonating reverse proxy for kube-apiserver (the
``proxy`` role), plus the device-side CONNECT service and the edge gateway.
The daemon is run by ``twistd banyan-kproxy --config FILE``.
"""

__version__ = "0.1.0"
