"""The ground floor: helpers that import nothing of relaymilter.

``safefile`` reads a file only if it is a regular file and not larger than a
limit; ``socketspec`` parses a milter socket (``unix:``, ``inet:``, ``inet6:``).
"""
