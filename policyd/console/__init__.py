"""The auditor and approver console: a small server-rendered web application
over the audit store and the approvals queue.

Pages are rendered on the server (FastAPI + Jinja2, no JavaScript) so that an
auditor's browser only ever receives the scrubbed, masked evidence the store
holds, and every read of that evidence is itself recorded (PCI DSS 10.2.1.3).
Run it with ``pgwarden console serve``; see docs/console.md.
"""

# The app lives in policyd.console.app; this package imports nothing so that
# the `pgwarden` command starts quickly.
