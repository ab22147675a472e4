"""Talk to the model: a Gradio web page, an HTTP API and a terminal chat over one generation engine."""
