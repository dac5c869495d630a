"""
Kubernetes audit events for every request through the proxy.

The proxy calls ``auditor.begin(...)`` when a request arrives and the returned
record's ``response_started`` / ``response_complete`` as the response goes out.  The
events (``audit.k8s.io/v1``, chosen by an ``audit.k8s.io/v1`` ``Policy``) go to a
durable spool (`banyan_kproxy.audit.spool`) and from there, batched as
kube-apiserver's webhook backend batches (`banyan_kproxy.audit.backend`), to the
sinks (`banyan_kproxy.audit.sinks`): a webhook, a JSON-lines log file, the Banyan
REST API.  `banyan_kproxy.audit.service.audit_services` builds it all from the
configuration.
"""

from banyan_kproxy.audit.auditor import NULL_RECORD, AuditRecord, Auditor, IAuditor, NullAuditor
from banyan_kproxy.audit.errors import AuditConfigError

__all__ = ["IAuditor", "Auditor", "NullAuditor", "AuditRecord", "NULL_RECORD", "AuditConfigError"]
