"""The shipped examples, apart from the product code: the invoice world (``invoices``), the
support-ticket world (``tickets``) and the tiny demo base model (``basemodel``). Their task
configs live in ``examples/<name>/tuneloop.yaml``; nothing outside this package names them."""
