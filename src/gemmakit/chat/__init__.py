"""Chat: templates, dialogue prompting and parsing of model output."""
