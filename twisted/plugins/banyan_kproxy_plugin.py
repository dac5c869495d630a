"""
twistd plugin for banyan-kproxy: ``twistd -n banyan-kproxy --config FILE``.

Every twistd run imports every plugin, so this file imports nothing heavy.
"""

from twisted.application.service import ServiceMaker

banyan_kproxy = ServiceMaker(
    "banyan-kproxy",
    "banyan_kproxy.tap",
    "Zero-trust OIDC access proxy for Kubernetes API servers.",
    "banyan-kproxy",
)
