"""The judge shared by AI feedback and the judged evaluations: the one rating type (`rating`), the client that
calls a judge and writes the audit log (`client`), and the generic readers of ratings (`parsing`).

Stages import this package; it imports no stage. A stage's own prompts and answer formats stay in the stage.
"""
