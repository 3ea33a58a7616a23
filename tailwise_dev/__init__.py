"""Development and local-stack helpers: start the S3, MLflow and Prefect servers that tests,
benchmarks and `make up` use. Step code never imports this package."""
