"""`dualrec-web`: the branch's web pages (dashboard for IT, review for auditors), a service of its
own beside the receiver. It reads the receiver's data directory read-only and holds the branch
age identity to decrypt; the receiver's upload path never sees that identity (docs/review.md).
"""
