"""
The one exception type audit set-up raises for files and settings it cannot use.
"""

from __future__ import annotations

__all__ = ["AuditConfigError"]


class AuditConfigError(ValueError):
    """
    The audit configuration cannot be used: a bad policy, webhook kubeconfig or
    setting.  The message is one line that names the file and, for a policy, the rule.
    """
