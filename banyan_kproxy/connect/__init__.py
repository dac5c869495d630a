"""
The device side: the local CONNECT proxy kubectl reaches through ``proxy-url``, its
next hop (an upstream CONNECT proxy, plain or over mutually authenticated TLS), the
kubeconfig writer, and the exec credential plugin that hands kubectl fresh ID tokens.
"""
