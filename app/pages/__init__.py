"""Dashboard pages: one module per page, each registering itself with ``dash.register_page``.

Dash imports these modules itself when an app is created (``use_pages=True``), so they are not imported by
the package; import them only after :func:`app.app.create_app`.
"""
