"""relaymilter: Exchange Online's relay-from-on-premises rule (550 5.7.64 ATTR36) as a milter."""

__version__ = "0.1.0"
