-- The demonstration PACS routes every CR and DX image it stores to the radvlm-pacs node (the modality
-- named "radvlm" in orthanc.json). What comes back from the node (SR, presentation states, secondary
-- captures) is neither CR nor DX and stays in Orthanc.
function OnStoredInstance(instanceId, tags, metadata, origin)
  local modality = tags['Modality']
  if (modality == 'CR' or modality == 'DX') and origin['RequestOrigin'] ~= 'Lua' then
    SendToModality(instanceId, 'radvlm')
  end
end
