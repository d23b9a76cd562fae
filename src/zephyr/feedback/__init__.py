"""AI feedback: judge prompts (`prompts`), ratings read from judge answers (`parsing`), preference pairs
(`binarize`) and the statistics report (`stats`). All pure; the judge calls live in the stage."""
