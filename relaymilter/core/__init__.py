"""The policy core: the decision and what it stands on. Pure Python, no pymilter, no MTA.

``policy`` judges a recipient (``Transaction.decide``); ``model`` is the
validated, immutable configuration it judges with; ``domains``, ``routing``,
``networks``, ``certnames``, ``tlsidentity`` and ``certfiles`` are what it
compares with; ``sourcesettings`` holds the ``sources:`` settings a
configuration carries. Imports only ``relaymilter.base``.
"""
