"""The milter front end (``relaymilter run``) for Postfix and Sendmail; only it imports pymilter.

``service`` is the daemon around libmilter; ``milter`` turns each callback
into a ``core.policy`` decision and a reply; ``selfcheck`` is the watchdog's
option negotiation on the milter's own socket.
"""
