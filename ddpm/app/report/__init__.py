"""The generated report: its sections (build.py), figures (figures.py) and HTML template
(templates.py).
"""
