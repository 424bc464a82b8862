"""The kquant operator: watches QuantizedModel resources and drives builds and serving."""
