"""The Postfix policy service front end (``relaymilter policy``): SMTPD policy delegation.

``service`` is the daemon (an asyncio event loop); ``server`` its connections;
``protocol`` the request and reply format; ``handler`` turns a request into a
``core.policy`` decision and an action, as the milter does a RCPT TO.
"""
