"""The judge shared by AI feedback and the judged evaluations: the client (`client`) and ratings read from
answers (`parsing`)."""
