"""The backends, one module each: what a backend is called, where it runs, and per op
the implementations it has with the condition of each (``spec.Backend``). The registry
(``fastres.backends``) collects them; nothing here imports it."""
