"""The tap's drivers: inline (owns both sockets) and ext_proc (Envoy's
network ext_proc stream)."""

# What a session gets when the tap drains (SIGTERM): PostgreSQL's own
# admin_shutdown, as ``Session.terminate(*SHUTDOWN)``.
SHUTDOWN = ("57P01", "the gateway is shutting down", "shutdown")
