"""The auditor and approver console: a small server-rendered web application
over the audit store and the approvals queue.

Pages are rendered on the server (FastAPI + Jinja2, no JavaScript) so that an
auditor's browser only ever receives the scrubbed, masked evidence the store
holds, and every read of that evidence is itself recorded (PCI DSS 10.2.1.3).
Run it with ``pgwarden console serve``; see docs/console.md.
"""

from policyd.console.app import create_app
from policyd.console.settings import ConsoleSettings

__all__ = ["ConsoleSettings", "create_app"]
