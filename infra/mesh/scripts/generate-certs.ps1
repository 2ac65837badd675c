<#
.SYNOPSIS
    Generate the mesh PKI: CA (if missing), a certificate per service and mesh-client, then verify.

.DESCRIPTION
    Calls `meshctl certs init` (skipped when OutputDir\ca\ca.crt exists, unless -Force),
    `meshctl certs issue --all` and `meshctl certs verify`.
    meshctl is found as: $env:MESHCTL, <repo>\.venv\Scripts\meshctl.exe (or .venv/bin/meshctl),
    `meshctl` on PATH, else `python -m aivo_mesh`.

.EXAMPLE
    .\infra\mesh\scripts\generate-certs.ps1 -OutputDir .\certs -ValidDays 365
.EXAMPLE
    .\infra\mesh\scripts\generate-certs.ps1 -CertDir .\certs -Force
#>
[CmdletBinding()]
param(
    [Parameter(Position = 0)]
    [Alias("CertDir")]
    [string] $OutputDir = "./certs",

    [Parameter(Position = 1)]
    [ValidateRange(1, 36500)]
    [int] $ValidDays = 0,

    [string] $Config = "",

    [switch] $Force
)

Set-StrictMode -Version Latest
$ErrorActionPreference = "Stop"

$RepoRoot = (Resolve-Path (Join-Path $PSScriptRoot "../../..")).Path

function Find-Meshctl {
    if ($env:MESHCTL) {
        return @($env:MESHCTL -split '\s+' | Where-Object { $_ -ne "" })
    }
    foreach ($candidate in @(
            (Join-Path $RepoRoot ".venv/Scripts/meshctl.exe"),
            (Join-Path $RepoRoot ".venv/bin/meshctl"))) {
        if (Test-Path -LiteralPath $candidate -PathType Leaf) { return @($candidate) }
    }
    $onPath = Get-Command meshctl -ErrorAction SilentlyContinue
    if ($onPath) { return @($onPath.Source) }
    foreach ($py in @(
            (Join-Path $RepoRoot ".venv/Scripts/python.exe"),
            (Join-Path $RepoRoot ".venv/bin/python"))) {
        if (Test-Path -LiteralPath $py -PathType Leaf) { return @($py, "-m", "aivo_mesh") }
    }
    $python = Get-Command python3 -ErrorAction SilentlyContinue
    if (-not $python) { $python = Get-Command python -ErrorAction Stop }
    return @($python.Source, "-m", "aivo_mesh")
}

function Invoke-Meshctl([string[]] $Arguments) {
    $exe = $script:Meshctl[0]
    $pre = @()
    if ($script:Meshctl.Count -gt 1) { $pre = $script:Meshctl[1..($script:Meshctl.Count - 1)] }
    & $exe @pre @Arguments
    if ($LASTEXITCODE -ne 0) {
        throw "meshctl $($Arguments -join ' ') failed with exit code $LASTEXITCODE"
    }
}

# @(...): a one-element result must stay an array, not collapse to a string.
$script:Meshctl = @(Find-Meshctl)
$configArgs = @()
if ($Config) { $configArgs = @("--config", $Config) }
$daysArgs = @()
if ($ValidDays -gt 0) { $daysArgs = @("--valid-days", "$ValidDays") }

$bundle = Join-Path (Join-Path $OutputDir "ca") "ca.crt"
if ((Test-Path -LiteralPath $bundle) -and -not $Force) {
    Write-Host "CA exists in $(Join-Path $OutputDir 'ca'): reusing it (pass -Force to replace it)"
}
else {
    $initArgs = @("certs", "init", "--output-dir", $OutputDir) + $configArgs
    if ($Force) { $initArgs += "--force" }
    Invoke-Meshctl $initArgs
}

Invoke-Meshctl (@("certs", "issue", "--all", "--output-dir", $OutputDir) + $daysArgs + $configArgs)
Invoke-Meshctl (@("certs", "verify", "--output-dir", $OutputDir) + $configArgs)
